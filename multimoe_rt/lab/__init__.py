"""The lab: experiments around the runtime. Tiny-zoo training and its recipes (``zoo``, ``recipes/``),
data location and checksums (``data``), model-merging baselines (``merge``), perplexity and ROUGE
(``evaluate``), QoS baselines (``baselines``) and the quality study (``quality``).

The lab imports the runtime (``multimoe_rt.*``); the runtime never imports the lab.
"""
