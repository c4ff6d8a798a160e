"""One training trial (SFT or GRPO) as a Ray Train run that leaves evaluated checkpoints."""
