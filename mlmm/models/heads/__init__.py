"""Task heads and fusion modules that run after the towers (registered in ``mlmm.registry.HEADS``).

A head is built as ``cls(cfg, model)`` (it reads tower widths / embed_dim / tokenizer from the model, never keeps
the model) and called as ``head(outputs, batch, model) -> dict`` of new outputs that losses consume (``model`` is
passed for heads that encode more inputs with its towers). Its static methods ``reads(cfg, model)`` and
``writes(cfg, model)`` declare the output keys it reads and writes (checked at config load, :mod:`mlmm.contracts`);
reading ``"<m>_tokens"`` / ``"<m>_token_mask"`` makes the model add tower m's token features.

Configured under ``model.heads: {<instance>: {name: <registered head>, ...}}``. Importing this
package registers every head.
"""
from mlmm.models.heads import language_adapter as _language_adapter  # noqa: E402,F401  (MLA stage-2 adapters)
from mlmm.models.heads import hashing as _hashing  # noqa: E402,F401  (hash: cross-modal hashing)
from mlmm.models.heads import divtr as _divtr  # noqa: E402,F401  (divtr: DI-vTR dual interaction)
from mlmm.models.heads import cmmae as _cmmae  # noqa: E402,F401  (cmmae: cross-modal mixer + masked autoencoder)
from mlmm.models.heads import vqa as _vqa, caption as _caption  # noqa: E402,F401  (vqa, caption: issue 7)
from mlmm.models.heads import ascl as _ascl  # noqa: E402,F401  (hierarchical_fusion: ASCL edits + global/local fusion)
from mlmm.models.heads import composed as _composed  # noqa: E402,F401  (composed: composed image retrieval, TIRG-style + DIM)
from mlmm.models.heads import vse as _vse  # noqa: E402,F401  (vse: alignment module + fusion encoder)
from mlmm.models.heads import mvsen as _mvsen  # noqa: E402,F401  (mvsen: graph matching + labels + text-text)
