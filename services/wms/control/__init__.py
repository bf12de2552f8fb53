"""The WMS's live side: TMS and pilot sessions, launch control, watch, streams and phases."""
