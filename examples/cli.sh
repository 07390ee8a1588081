kvatlas list --principle token-eviction --implemented
kvatlas cite snapkv
kvatlas passkey --n 2 --tokens 400 --output passkey.jsonl
kvatlas generate --method streamingllm --ratio 4 --input passkey.jsonl --output answers.jsonl
