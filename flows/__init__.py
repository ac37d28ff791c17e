"""refdir.flows"""
