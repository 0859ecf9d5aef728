"""The trained demo model's world: procedural scenes, the tokenizer's training half, training loops and the
yardstick classifier. Nothing here runs during generation; the generation path only loads the weights."""
