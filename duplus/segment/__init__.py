"""`duplus segment`: segment scans with free-text class prompts; masks land on exactly the input grid.

A run goes request -> read and check -> predict -> write, one module each step or concern:

- :mod:`~duplus.segment.command`: the command line; its mistakes are answered before torch is imported;
- :mod:`~duplus.segment.api`: ``segment_image`` (one scan into a folder) and ``segment_images`` (in memory);
- :mod:`~duplus.segment.request`: prompts and options resolved and checked before any scan or model;
- :mod:`~duplus.segment.checks`: contradicting options refused, a doubtful region or modality warned about;
- :mod:`~duplus.segment.segmenter`: ``Segmenter`` reads, checks and preprocesses a scan, predicts, writes;
- :mod:`~duplus.segment.network`: the network and prompt embeddings, loaded once and kept across calls;
- :mod:`~duplus.segment.knowledge`: what a model was trained on, and which prompts are zero-shot;
- :mod:`~duplus.segment.outputs`: the output folder (names, format, checks, stale files, mask images);
- :mod:`~duplus.segment.dicom`: DICOM SEG and RT Structure Set outputs of a DICOM series;
- :mod:`~duplus.segment.batch`: many scans (a folder or a CSV list), one model load, a summary, reruns.

Sliding-window inference itself is shared with evaluation (``duplus.inference.predict``).
"""
