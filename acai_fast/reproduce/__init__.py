"""`acai-fast reproduce ...`: the paper's tables, trained and evaluated as the paper does, written next
to the paper's own numbers (lines: acai_fast.reproduce.lines; probe and clustering:
acai_fast.reproduce.downstream). Shared bookkeeping in acai_fast.eval.stats."""
