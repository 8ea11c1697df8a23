"""Task heads and fusion modules that run after the towers (registered in ``mlmm.registry.HEADS``).

A head is built as ``cls(cfg, model)`` (it reads tower widths / embed_dim / tokenizer from the
model, never keeps the model) and called as ``head(outputs, batch) -> dict`` of new outputs that
losses consume. ``needs_tokens``: the modalities whose token features it reads
(``outputs["<m>_tokens"]`` [B, T, D_m] and ``outputs["<m>_token_mask"]`` Bool[B, T]).

Configured under ``model.heads: {<instance>: {name: <registered head>, ...}}``. Importing this
package registers every head.
"""
