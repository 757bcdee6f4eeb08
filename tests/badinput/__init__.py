"""The bad-input corpus (issue 16, "trust on first contact").

Every case is data: an id, a kind (image, labels, counts, coco, voc, yolo, model, option, api,
train), a builder that writes its inputs into the case's own temporary folder, the command or
Python call that takes them, and the outcome the issue asks for:

- ``error``: exit code 2 (or a :class:`~weakloc.errors.WeaklocError` from the Python API) with one
  line that names the offending file, row or option;
- ``skip``: exit 0, and the output names (or counts) the input that was skipped;
- ``ok``: exit 0 and a correctness check on the output.

Nothing is stored as a binary fixture: :mod:`files` writes every bad file at test time. The
harness (:mod:`harness`) runs each case in a forked child with a time and memory limit, so a
segfault, a hang or a runaway allocation fails that case instead of the suite, and it checks that
nothing was written outside the folders the command may write to.
"""
