"""The TMS: starts and stops one cluster of pilot jobs per taskforce and streams job states to the
WMS. Built in the issue "TMS, streamed status, and `ewms run` end to end"."""
