"""fedmole.algorithms"""
