"""Head effects, circuits and their vulnerability under fine-tuning (docs/method.md)."""
