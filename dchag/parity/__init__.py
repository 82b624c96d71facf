"""The parity study: does D-CHAG train as well as the flat baseline? (tools/parity.py)

    methods.py    method specs ("linear", "cross:g=32:k=2") -> the pretrain flags they override
    stats.py      paired relative gaps over seeds with a 95 % Student-t interval
    (baselines)   what a model must beat, on the exact held-out batches: each task's own
                  (dchag/tasks: ``Task.baselines``), e.g. channel and visible-pixel mean (MAE),
                  persistence and climatology (forecast), the training mean or class prior (dense)
    study.py      every method x seed trained in-process with the same data, steps and schedule
    report.py     parity.json, parity.md, parity.png and the per-method pictures
"""
