"""fedmole.evaluation"""
