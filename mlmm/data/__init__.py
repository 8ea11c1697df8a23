"""Data: what turns files into batches. Import from the module that defines a name (no re-exports here).

* writers: :mod:`~mlmm.data.write_shards` (a JSONL manifest), :mod:`~mlmm.data.from_hf` (a Hugging Face dataset),
  :mod:`~mlmm.data.shard_output` (their ``--out`` to a bucket, URL or ``pipe:``), :mod:`~mlmm.data.answers` (the VQA
  answer vocabulary);
* the reader: :mod:`~mlmm.data.shards` (shard specs, per-slot sample streams), :mod:`~mlmm.data.shardio` (opening,
  retries, counts), :mod:`~mlmm.data.stream` / :mod:`~mlmm.data.train_stream` (the resumable training stream and
  its loader), :mod:`~mlmm.data.preprocess` (samples -> model inputs: ``Preprocessor``, ``load_eval_items``),
  :mod:`~mlmm.data.collate` (samples -> ``Batch``), :mod:`~mlmm.data.decoders` and :mod:`~mlmm.data.transforms`
  (per-modality decoding), :mod:`~mlmm.data.video`, :mod:`~mlmm.data.batch` (``Batch``);
* text: :mod:`~mlmm.data.tokenization`, :mod:`~mlmm.data.sentencepiece`, :mod:`~mlmm.data.vocab`,
  :mod:`~mlmm.data.word_edits`; :mod:`~mlmm.data.resplit` (re-splitting shard sets).

Generated data for tests and the demo lives in :mod:`mlmm.synthetic`.
"""
