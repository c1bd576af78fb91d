"""The paper's QoS experiment (batch 1, Poisson arrivals): "ours" is the runtime's ``engine.Engine`` at
``max_seqs=1``; its peers are the batch-1 baselines of ``systems`` (partitioned = MIG-like lanes, swap,
resident), fed by the experiment's lane driver (``lanes``); ``metrics`` turns request timestamps into TTFT,
turnaround and throughput. ``multimoe_rt.benchmarks.qos`` runs the sweep.
"""
