"""Microbenchmarks behind `dinov3-fast bench`: cases (shape presets), timing, memory, roofline."""
