"""Embedded synthetic competitions in layouts other than State Farm's, so the pipeline meets more than one."""
