"""Dramatiq workers: the step actor, its executor and the step actions."""
