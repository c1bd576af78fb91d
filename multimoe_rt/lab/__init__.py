"""The lab: experiments around the runtime. Tiny-zoo training and its recipes (``zoo``, ``recipes/``),
data location and checksums (``data``), model-merging baselines (``merge``), perplexity and ROUGE
(``evaluate``), the batch-1 QoS experiment and its baselines (``qos``) and the quality study
(``quality_systems``, ``quality_report``).

The lab imports the runtime (``multimoe_rt.*``); the runtime never imports the lab.
"""
