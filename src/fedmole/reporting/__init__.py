"""fedmole.reporting"""
