"""Serving: sequences, block manager, scheduler, batch, runner, the engine step, async and sync engines."""
