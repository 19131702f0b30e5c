"""Graders: functions from (prompt, completion) to labels or scores."""
