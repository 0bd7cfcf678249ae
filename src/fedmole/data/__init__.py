"""fedmole.data"""
