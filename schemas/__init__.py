"""refdir.schemas"""
