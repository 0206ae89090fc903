"""Load generator and side-by-side benchmark: tokenslice against vLLM FCFS, vLLM priority and plain chunking."""
