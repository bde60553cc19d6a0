"""A small verifiable math world for running OPD/TRB end to end on CPU in minutes.

  tasks      synthetic multi-step arithmetic word problems, worked solutions, \\boxed answers
  tokenizer  the word-level tokenizer (111 ids) in the Hugging Face format, teacher and Base copies
  pretrain   SFT / pretraining loop for small Qwen3 models (pure JAX + optax)
  build      the world (splits, teacher, student) built or fetched: `ensure_toy_world()`

See docs/toy.md.
"""
