"""Relation-based knowledge: relations between layers or between samples."""
