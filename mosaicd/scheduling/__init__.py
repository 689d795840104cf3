"""Where the next run is chosen: the queue, holds, dispatch, and what worker events mean."""
