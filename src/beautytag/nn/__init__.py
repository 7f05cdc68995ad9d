"""The network: attention, colour heads, the multi-task net and its losses."""
