# handler.py
def handle(ctx):
    """ctx is parsed JSON from the HOTCELL_INPUT env var."""
    name = ctx.get("name", "world")
    print(f"Processing {name}")        # goes to VmResult.console_output
    return {"greeting": f"Hello, {name}!"}  # goes to VmResult.result
