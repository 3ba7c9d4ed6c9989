"""`alambic train`: distil interactions into a student. losses.py (pure loss functions), data.py (interactions →
tensors), students.py (preset / HF directory / pruned teacher, LoRA), trainer.py (`TrainConfig`, `run`)."""
