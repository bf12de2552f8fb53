"""The pilot: runs the task once per event inside each worker. Built in the issue "The pilot: one
task per event, isolated, fast, and never losing an event"."""
