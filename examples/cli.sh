kvatlas list --principle token-eviction --implemented
kvatlas cite snapkv
kvatlas passkey --n 2 --tokens 400 --output passkey.jsonl
kvatlas generate --method streamingllm --ratio 4 --input passkey.jsonl --output answers.jsonl
kvatlas generate --method "snapkv:ratio=2,window=32+kivi:bits=4" --input passkey.jsonl --output composed.jsonl
