"""Generated data for tests, the demo and benchmarks (not part of a user's data path): each module writes media
files + an mlmm manifest (then ``mlmm-shards``), and ``mlmm-synthetic KIND`` (:mod:`mlmm.synthetic.cli`) runs any
of them.

* :mod:`~mlmm.synthetic.shapes`: labelled shapes, moving shapes and tones with en/de/fr captions;
* :mod:`~mlmm.synthetic.av`: paired video + audio clips and a temporal-order video set;
* :mod:`~mlmm.synthetic.scenes`: fine-grained attribute / object scenes (ASCL, VSE, MVSEN);
* :mod:`~mlmm.synthetic.vqa`: a multilingual VQA set over drawn scenes;
* :mod:`~mlmm.synthetic.composed`: composed image retrieval triplets;
* :mod:`~mlmm.synthetic.noisy`: a manifest with a fraction of its captions shuffled.
"""
