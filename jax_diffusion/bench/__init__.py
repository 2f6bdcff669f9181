"""Benchmarks (`--mode=bench`, `make bench`): random data, compile timed apart, medians of windows.

run.py         --mode=bench: the parts table (train, fwd, sample, data, host, checkpoint,
               memory, eval), one JSON line
flops.py       analytic U-Net FLOPs, for achieved FLOP/s and MFU
dataset.py     a CIFAR-shaped tfds dataset of random images for the data part
host.py        host-side parts: steps per compiled call, checkpoint stall
evaluation.py  the eval part: sampling batch gaps, Inception FLOPs, the --mode=eval projection
"""
