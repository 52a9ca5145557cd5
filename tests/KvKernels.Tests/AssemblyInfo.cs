[assembly: AssemblyFixture(typeof(KvKernels.Tests.Backends))]
