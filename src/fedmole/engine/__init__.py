"""fedmole.engine"""
