"""fedmole.adapters"""
