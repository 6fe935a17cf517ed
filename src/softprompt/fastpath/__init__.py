"""The fast path: the frozen-model interface (:mod:`.frozen`), the one module that owns prompt
keys/values (:mod:`.prompt_kv`), verbalizer scoring (:mod:`.scoring`) and batched decoding over
prompt caches (:mod:`.decoding`). Training, evaluation, the Engine and the server all run here."""
