"""Training: one Accelerate recipe for every stage (text, clip, align, finetune)."""
