"""peftc.passes.methods: one file per PEFT method (its spec class, its rewrite pass, its PEFT
mapping), plus the rewrite helpers several methods share (linear, gates, train).

Importing a method file registers the method with its phase (``peftc.spec.register_method``).
"""
