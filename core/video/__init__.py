"""Video I/O: streaming sources and sinks, the input policy, atomic output paths, generated test videos."""
