from reference_impls import KVCache, StreamingLLM, load_model

model, tok = load_model()                      # embedded SmolLM2-135M-Instruct, offline; or any HF id/path
ids = tok.apply_chat_template([{"role": "user", "content": "Name three prime numbers."}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
cache = KVCache(model, StreamingLLM(ratio=4))  # any implemented method
out = model.generate(ids, cache=cache, max_new_tokens=20, do_sample=False)
print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
print(cache.nbytes(), "bytes held vs", cache.full_nbytes(), "for the full cache")
