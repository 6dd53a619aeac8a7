"""``effdet-bench``: speed and memory of the model and the official pipeline, beside the ``effdet``
package when it is installed (same process, interleaved, median of N, ratios)."""
