"""Schemas of the params sections that more than one stage reads (a stage never imports another stage)."""
