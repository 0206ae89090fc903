"""tokenslice: preemptive, time-sliced (chunked-decoding) LLM serving."""

__version__ = "0.1.0"
