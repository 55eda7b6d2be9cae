"""Device-side compute: the model (transformers + peft), the data, and the local trainer."""
