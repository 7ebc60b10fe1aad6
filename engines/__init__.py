"""Runtimes over nested checkpoints and build directories, all with one duck-typed interface:

    engine.budgets                      budget names, largest first
    engine.set_budget(name)             instant: no weight is loaded or copied
    engine.prefill(ids, mask=None, last_only=False) -> logits [b, l, V] (or [b, V]) float32 torch
    engine.decode(tokens [b])           -> logits [b, V]
    engine.generate(ids, max_new_tokens, temperature=0, top_k, top_p, eos_token_id, callback)

- torch_engine.TorchEngine(model, budgets): the nested weights themselves (views per budget).
- ort_engine.OrtEngine(build_dir): ONNX Runtime sessions of every budget over one weight buffer.
- trt (GPU machines): TensorRT engines; see that module.
"""
