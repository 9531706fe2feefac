"""The tools: training and evaluation, the benchmark, the self-chat repetition measure and the
style lab. Each uses the library as a face would (the engine, the generators, the settings);
nothing in the library imports them."""
