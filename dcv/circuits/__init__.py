"""Head effects, circuits and their vulnerability under fine-tuning (DESIGN.md, "Circuit definitions").

The names every circuits module and table share live here, so that pure modules (the analysis, the
config) name them without importing torch or a stage."""

Head = tuple[int, int]  # (layer, head within the layer)
PATCHING_METHODS = ("exact", "attribution", "ig")  # dcv.circuits.patching.item_effects
MASK = "mask"  # learned masks (dcv.circuits.mask): one item over all heads, not patching
