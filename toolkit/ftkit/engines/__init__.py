"""What recipe steps run: tiny-model generation, training, merging, serving checks and
evaluation. Only here may torch, transformers, peft, trl and datasets be imported, and
only inside the functions that need them."""
