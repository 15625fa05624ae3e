"""Image-level labelers (``data.labels=predicted``, the ``labeler`` config group): which classes each image holds,
predicted without ground truth. One module per labeler; each is built from its config node."""
