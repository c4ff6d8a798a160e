"""Head effects, circuits and their vulnerability under fine-tuning (DESIGN.md, "Circuit definitions")."""
